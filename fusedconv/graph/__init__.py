"""Graph passes: find Conv -> BN (-> act) (-> + residual -> act) chains in a model, check they are exactly
foldable, and splice in FusedConv2d modules at the smallest scope that holds each chain.

    tracing.py    per-scope torch.fx tracing (submodules as leaves), without side effects on the model
    legality.py   which BatchNorm / conv modules may be folded, and why not
    sequential.py chains among the consecutive children of a plain nn.Sequential (no tracing needed)
    dataflow.py   the walk over every module scope: Sequentials directly, the others traced and rewritten
    chains.py     the chain records (Chain, Absorb) and the fx calls that count as add / BN / reshape
    chain_match.py  one chain from a conv call, proven exact step by step (residual adds, functional ops)
    scope_pass.py one traced scope: plan its chains, build the FusedConv2d modules, rewrite its graph
    patterns.py   the call patterns of a forward worth tracing and the guards that recognise them
    scope_rewrite.py  one scope over all its patterns: fuse, specialize, keep the exact fallback
    specialize.py the guarded subclass a rewritten block becomes, its dispatch, copying and pickling
    roles.py      stand-ins for the original conv / BN children that the exact fallback runs
    reparam_*.py  structural re-parameterization (multi-branch sums -> one conv), run before the above
    exported.py   ExportedProgram / TorchScript at the aten level (exported_chains.py matches, exported_rewrite.py
                  splices the op in)
"""
