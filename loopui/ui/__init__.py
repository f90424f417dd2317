"""The Gradio page (the only package besides ``app.py`` that imports gradio) over :class:`loopui.studio.Studio`.

``page.py`` lays out the Blocks, ``events.py`` holds the handlers and wires them, ``updates.py`` builds the
``gr.update`` values, ``components.py`` the upload and API inputs; ``build_app(studio)`` makes the queued page.
"""

from loopui.ui.page import QUEUE_MAX_SIZE, build_app, launch_options

__all__ = ["QUEUE_MAX_SIZE", "build_app", "launch_options"]
