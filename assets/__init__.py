"""Where a machine gets what it cannot download at run time: pinned package archives and the bases built from them."""
