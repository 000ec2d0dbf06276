"""The HTTP routes: the 2018 /classify API, Open Inference Protocol v2, docs and the demo page."""
