"""The Faust side of the living efficacy pipeline: settings, topics, agents, CLI,
and the local Kafka launcher. Wires model/ to Kafka; no numerics here."""
