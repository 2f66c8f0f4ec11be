"""One module per method behind one interface (`base.Detector`); `registry.METHODS` is the one
place that knows every method by the name its rows carry."""
