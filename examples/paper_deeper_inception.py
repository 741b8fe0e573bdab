"""The Net2Net paper's deeper Inception-BN, on the zoo's factorized Inception-BN.

    PYTHONPATH=. python examples/paper_deeper_inception.py

In every module, after the last vertical-horizontal (3x1, 1x3) pair of the double branch, two more such pairs go
in, each an identity conv-BN-ReLU (the input is a ReLU output, so the ReLU is exact).  The script deepens the
PyTorch model (batch norms calibrated on 8 batches of 32), then the same model exported to ONNX through the
command line, and prints what was checked.
"""

import os
import subprocess
import sys
import tempfile
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import graphgrow  # noqa: E402
from graphgrow import models  # noqa: E402

torch.manual_seed(0)
teacher = models.inception_bn(factorized=True).eval()   # in real use: your trained teacher
x = models.example_inputs("inception_bn", batch=2)
calibration = [torch.randn(32, 3, 32, 32) for _ in range(8)]  # in real use: batches of training data

student = graphgrow.deepen(teacher, after=models.PAPER_DEEPER_AFTER, kernel=models.PAPER_DEEPER_KERNEL,
                           example_inputs=x, calibrate=calibration)
print("fx:  ", student.graphgrow_report.summary())

with tempfile.TemporaryDirectory() as tmp:
    src, out = os.path.join(tmp, "inception.onnx"), os.path.join(tmp, "inception.deep.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(teacher, (x[0][:1],), src, dynamo=False)
    cmd = [sys.executable, "-m", "graphgrow", "deepen", src, "--after", r".*/branch_dbl3x3\.2\.1/act/Relu",
           "--kernel", models.PAPER_DEEPER_KERNEL, "-o", out]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    print("onnx:", r.stdout.splitlines()[0] if r.returncode == 0 else r.stderr.strip())
    sys.exit(r.returncode)
