"""loopui: seamlessly looping videos from pre-trained video diffusion models, training-free.

Importing this package is cheap: it touches no GPU, no network and no weights. The heavy parts live in
``loopui.engine`` (sampling), ``loopui.models`` (loading), ``loopui.media`` (export, seam metrics),
``loopui.saliency`` (masks), ``loopui.studio`` (the app's service), ``loopui.ui`` (its Gradio page) and
``loopui.cli``.
"""

__version__ = "0.1.0"
