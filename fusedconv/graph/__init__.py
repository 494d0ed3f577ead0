"""Graph passes: find Conv -> BN (-> act) (-> + residual -> act) chains in a model, check they are exactly
foldable, and splice in FusedConv2d modules at the smallest scope that holds each chain.

    tracing.py    per-scope torch.fx tracing (submodules as leaves), without side effects on the model
    legality.py   which BatchNorm / conv modules may be folded, and why not
    sequential.py chains among the consecutive children of a plain nn.Sequential (no tracing needed)
    dataflow.py   the walk over every module scope and the fx-graph pass (residual adds, functional ops)
    reparam_*.py  structural re-parameterization (multi-branch sums -> one conv), run before the above
"""
