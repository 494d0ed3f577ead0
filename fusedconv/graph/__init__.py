"""Graph passes: find Conv -> BN (-> act) (-> + residual -> act) chains in a model, check they are exactly
foldable, and splice in FusedConv2d modules at the smallest scope that holds each chain.

    tracing.py    per-scope torch.fx tracing (submodules as leaves), without side effects on the model
    legality.py   which BatchNorm / conv modules may be folded, and why not
    sequential.py chains among the consecutive children of a plain nn.Sequential (no tracing needed)
    dataflow.py   the walk over every module scope and the fx-graph pass (residual adds, functional ops)
    patterns.py   the call patterns of a forward worth tracing and the guards that recognise them
    scope_rewrite.py  one scope over all its patterns: fuse, specialize, keep the exact fallback
    specialize.py the guarded subclass a rewritten block becomes, its dispatch, copying and pickling
    roles.py      stand-ins for the original conv / BN children that the exact fallback runs
    reparam_*.py  structural re-parameterization (multi-branch sums -> one conv), run before the above
"""
