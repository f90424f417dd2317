"""The app's service without gradio (``loopui.ui`` is the page over it).

``Studio`` (``studio.py``) holds the model manager, the device pool, the waiting line and the jobs; ``knobs.py``
says what the page's knobs offer per model, ``requests.py`` builds a checked request from page or API values,
``masks.py`` makes mask previews, ``results.py`` the texts and gallery entries of a finished loop, ``files.py``
keeps the session folders, ``jobs.py`` runs a generation in a worker thread, ``devices.py`` and ``zerogpu.py``
choose the devices and size ZeroGPU calls.
"""

from loopui.studio.jobs import JobRegistry, LoopJob
from loopui.studio.knobs import PREVIEW_SETTINGS, KnobState, Knobs, ModelView
from loopui.studio.results import HistoryEntry, LoopOutcome
from loopui.studio.studio import Studio

__all__ = ["PREVIEW_SETTINGS", "HistoryEntry", "JobRegistry", "KnobState", "Knobs", "LoopJob", "LoopOutcome",
           "ModelView", "Studio"]
