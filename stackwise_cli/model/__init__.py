"""The model: config (torch-free), the modules, and the Hugging Face name mapping."""
