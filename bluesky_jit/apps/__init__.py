"""What people run: the command line, settings files, the demo, replay, listeners, the live view.

Built on the package's data path (``bluesky_jit.callbacks``,
``bluesky_jit.worker_process``, ``bluesky_jit.catalog``, ...), which imports
nothing from here.
"""
