from weightmerge.methods._stub import stub

LINEAR_SPEC = stub("dare_linear")
TIES_SPEC = stub("dare_ties")
