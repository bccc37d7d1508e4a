from weightmerge.methods._stub import stub

SPEC = stub("regmean")
