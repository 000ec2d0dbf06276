"""LitServe: the same /classify API with LitServe's request batching on.

    python benchmarks/peers/litserve_app.py MODEL_DIR --engine onnxruntime|openvino --port 8091

One inference worker on the CPU; requests are batched up to MAX_BATCH requests or BATCH_TIMEOUT_S, each
request's images decoded in the worker, the batch run as one forward pass and split back per request.
"""

import litserve as ls
import numpy as np

import common

MAX_BATCH, BATCH_TIMEOUT_S = 8, 0.005  # requests per batch; LitServe's documented batching knobs

args = common.arguments(__doc__)


class Classifier(ls.LitAPI):
    def setup(self, device):
        self.pp = common.preprocessing(args.model_dir)
        self.forward = common.engine(args.model_dir, args.engine)

    def decode_request(self, request):
        return np.stack([common.preprocess(f.file.read(), self.pp) for f in request.getlist("images")])

    def batch(self, inputs):
        return inputs  # a list of per-request stacks: kept apart so predict can split the answer back

    def predict(self, stacks):
        probs = common.top5(self.forward(np.concatenate(stacks)))
        out, at = [], 0
        for s in stacks:
            out.append(probs[at : at + len(s)])
            at += len(s)
        return out

    def unbatch(self, output):
        return output

    def encode_response(self, answer):
        return answer


if __name__ == "__main__":
    api = Classifier(max_batch_size=MAX_BATCH, batch_timeout=BATCH_TIMEOUT_S, api_path="/classify")
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=120)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")  # no line per request
