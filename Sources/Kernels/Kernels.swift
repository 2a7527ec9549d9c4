// Kernels layer of nolad — see DESIGN.md for what belongs here.
