"""The MoHGE layer: router, dispatcher, routed experts, auxiliary losses."""
