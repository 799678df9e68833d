"""Pure numerics of the living efficacy model: configs and arrays in, arrays out.

No Kafka, no I/O, no globals. See DESIGN.md, "The statistical model".
"""
