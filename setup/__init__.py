"""setup/ — set-up steps run once on a fresh machine (README 二).

real_model.py    converts the trained real:smollm2-135m (a GGUF file shipped by a package) into a model folder.
"""
