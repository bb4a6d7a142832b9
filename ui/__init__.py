"""The Gradio front end: one module per tab, each built by ``build_<name>_tab(backend)``; ``app.py`` composes them.

UI modules only wire widgets to library callables; the tensor maths lives in ``finetuners``.
"""
