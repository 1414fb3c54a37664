"""The `kvfuse` command line (click): build-cache, gc, inspect, ask, serve, eval, bench, demo.

The top of the import stack: cli -> bench -> serve -> pipeline -> runtime -> loader.
"""
