"""APEX (Advantageous Parameter EXpansion, arXiv 2505.24241).

geometry (torch-free: units, k, blocks, layers and stages of a config) ; the pure-tensor core:
scoring (statistics and rank votes) -> selection (P, N, E) -> partition (balancing permutation across
TP ranks) -> monarch (structured M) -> operator (W_eff, fuse) ; partial (selected-mode deltas) ;
inplace (W_eff written into the weights once per step) ; state (optimizer states and collectives) ;
and the run's pieces over them: votes (the scoring hooks), boundary (select, permute, build, fuse),
resume (checkpoint compatibility), engine (the trainer callback that dispatches to them).

Import the modules themselves (``from megatron_apex.expansion import geometry``): the package imports
nothing, so the geometry is available without torch.
"""
