"""fplus: train and evaluate the F+ vision-language-action policy (see DESIGN.md)."""

__version__ = "0.1.0"
