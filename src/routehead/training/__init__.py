"""Learning from stored passes: head detection, pseudo labels, the router's objectives and its fitting."""
