// A producer in Java: one record per stdin line "TOPIC<TAB>KEY<TAB>JSON".
//
//   java -cp '.cache/kafka/libs/*' examples/producers/Producer.java HOST:PORT < records.tsv
//
// Keys are patient ids. Kafka's Java client puts a keyed record on
// murmur2(key) mod partitions, which is where the worker expects a patient's
// records. librdkafka clients (confluent-kafka, Go, node-rdkafka, .NET) must set
// partitioner=murmur2_random to do the same; a record elsewhere is re-routed by
// the worker (efficacy_events_rerouted_total), one hop later.
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.util.Properties;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.serialization.StringSerializer;

public class Producer {
    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        props.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
        props.put(ProducerConfig.ACKS_CONFIG, "all");
        props.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, "true");
        props.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        props.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        int sent = 0;
        try (KafkaProducer<String, String> producer = new KafkaProducer<>(props);
             BufferedReader in = new BufferedReader(
                 new InputStreamReader(System.in, StandardCharsets.UTF_8))) {
            String line;
            while ((line = in.readLine()) != null) {
                String[] fields = line.split("\t", 3);
                producer.send(new ProducerRecord<>(fields[0], fields[1], fields[2])).get();
                sent++;
            }
        }
        System.out.println("sent " + sent);
    }
}
