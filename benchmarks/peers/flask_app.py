"""Flask: the app a user writes in an afternoon, the 2018 API on one model.

    python benchmarks/peers/flask_app.py MODEL_DIR --engine onnxruntime|openvino --port 8090

Threaded Flask, one forward pass per request (Flask has no batching), POST /classify with the images in
the multipart field `images`; the top 5 per image as JSON.
"""

import logging

import numpy as np
from flask import Flask, jsonify, request

import common

args = common.arguments(__doc__)
pp = common.preprocessing(args.model_dir)
forward = common.engine(args.model_dir, args.engine)
app = Flask(__name__)
logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request


@app.post("/classify")
def classify():
    pixels = np.stack([common.preprocess(f.stream.read(), pp) for f in request.files.getlist("images")])
    return jsonify(common.top5(forward(pixels)))


app.run(host="127.0.0.1", port=args.port, threaded=True)
