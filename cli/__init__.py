"""The ``efficacy`` command and the tools around the worker: the demo, the
simulator and programme builder, the offline fit, the readers of the output
topics, the report, and the local Apache Kafka launcher the tests use."""
