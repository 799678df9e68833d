"""The worker: settings, topics, schemas, agents, state and the pure stream
steps, wired to Kafka through faust. Numerics live in model/; the command line
and the development tools (demo, simulator, local broker) in cli/."""
