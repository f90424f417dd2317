"""Tools for tests, benchmarks and scripts -- never imported by the app or the library.

``faithful`` builds every registry model from its real configuration (``configs/``), shrunk only in width and depth
(or at full size with random weights, for the GPU benchmark); ``browser`` drives the studio page in a real browser.
They live in the package rather than under ``tests/`` because the benchmarks and scripts use them too, and a GPU
machine gets only the repository tree.
"""
