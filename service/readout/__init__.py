"""The A/B readout (``mtrank ab report``) and the training data as served (``mtrank logs export
--with-outcomes``): the prediction log joined with the outcome events. Plain functions over
numpy and pandas; only :mod:`service.readout.load` talks to Redis."""
