"""Running methods against each other on labelled data: the course's quick setup (`demo`), one
target (`compare`) and leave-one-product-out over many (`loo`)."""
