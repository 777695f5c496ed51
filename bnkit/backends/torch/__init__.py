"""The PyTorch backend (plain `torch.nn.Module` models, torchvision and timm included).

`core` walks modules, detects and pins BN layers; `deploy` is what `check` and `export`
need. Importing this package imports no framework.
"""
