"""Building engines: the reference a build checks against (``reference``), the inputs FP8
calibration and the end-to-end check read (``calibration``), and the stages (``stages``)."""
