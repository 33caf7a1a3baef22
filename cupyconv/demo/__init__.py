"""The seed's model, trained end to end with cupyconv: the "(Re-)Imag(in)ing
Price Trends" CNN (Jiang, Kelly & Xiu) on synthetic OHLC chart images.

``python -m cupyconv demo --help`` lists the options.  Modules:
:mod:`~cupyconv.demo.charts` (the data), :mod:`~cupyconv.demo.model`
(layers, forward and backward, Adam), :mod:`~cupyconv.demo.train` (the
training loop, progress bar, plots and command line).
"""

from .train import main

__all__ = ["main"]
