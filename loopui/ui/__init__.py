"""The Gradio app (the only package besides ``app.py`` that imports gradio).

``Studio`` holds the app's state and logic (gradio-free); ``build_app(studio)`` makes the queued Blocks page.
"""

from loopui.ui.blocks import QUEUE_MAX_SIZE, build_app, launch_options
from loopui.ui.jobs import JobRegistry, LoopJob
from loopui.ui.studio import PREVIEW_SETTINGS, Studio

__all__ = ["PREVIEW_SETTINGS", "QUEUE_MAX_SIZE", "JobRegistry", "LoopJob", "Studio", "build_app", "launch_options"]
