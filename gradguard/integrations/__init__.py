"""Framework integrations: ``gradguard.integrations.lightning``, ``.transformers`` (Hugging Face
Trainer / Accelerate) and ``.tensorboard``.

Each submodule imports its framework when it is imported, never before: ``import gradguard`` needs
none of them, and importing a submodule without its framework raises an ImportError that names
the package to install (all of them: ``pip install -r requirements-integrations.txt``).
"""
