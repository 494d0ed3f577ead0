"""Graph passes: find Conv -> BN (-> act) chains in a model, check they are exactly foldable, and splice in
FusedConv2d modules at the smallest scope that holds each chain."""
