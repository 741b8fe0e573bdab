"""Frontend-neutral core: channel spaces, widening plans and Net2Net weight arithmetic.

Nothing in this package imports torch; the torch.fx and ONNX frontends feed it
numpy label arrays and weight arrays.
"""
