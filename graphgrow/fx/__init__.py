"""torch.fx frontend: tracing, label propagation over fx graphs, module rewriting."""
