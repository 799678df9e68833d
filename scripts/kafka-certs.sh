#!/usr/bin/env bash
# The compose stack's TLS material and Kafka credentials, written by the one-shot
# service `kafka-certs` (apache/kafka image: keytool from its JRE) into two volumes:
#
#   $SECRETS (kafka-secrets, the broker's only): keystore.p12 (the broker's key and
#     certificate for the names kafka and localhost, signed by a CA made here),
#     truststore.p12 (that CA), kafka_jaas.conf (SASL: the admin user for PLAIN,
#     SCRAM users live in Kafka's metadata) and admin.properties (the admin
#     tools' client settings: health check, SCRAM user creation);
#   $CA_DIR (kafka-ca, mounted read-only by the clients): ca.pem.
#
# Passwords come from the environment (.env: scripts/make-env.sh). The CA's key is
# deleted once the broker's certificate is signed. Run again, it keeps what it
# made while the keystore opens with the current password, else makes it again.
set -euo pipefail
: "${KAFKA_SSL_PASSWORD:?}" "${KAFKA_ADMIN_PASSWORD:?}"
SECRETS=${SECRETS:-/etc/kafka/secrets}
CA_DIR=${CA_DIR:-/etc/kafka/ca}
KEYTOOL=${KEYTOOL:-keytool}
DAYS=${DAYS:-825}
NAMES=${NAMES:-dns:kafka,dns:localhost}
pass=$KAFKA_SSL_PASSWORD
umask 077
cd "$SECRETS"

if ! "$KEYTOOL" -list -keystore keystore.p12 -storetype PKCS12 -storepass "$pass" >/dev/null 2>&1 \
    || [[ ! -s $CA_DIR/ca.pem ]]; then
    rm -f ca.p12 keystore.p12 truststore.p12 broker.csr broker.pem
    "$KEYTOOL" -genkeypair -keystore ca.p12 -storetype PKCS12 -storepass "$pass" -alias ca \
        -dname "CN=living-efficacy compose CA" -keyalg RSA -keysize 3072 -validity "$DAYS" \
        -ext bc:c
    "$KEYTOOL" -exportcert -keystore ca.p12 -storetype PKCS12 -storepass "$pass" -alias ca \
        -rfc -file "$CA_DIR/ca.pem"
    "$KEYTOOL" -genkeypair -keystore keystore.p12 -storetype PKCS12 -storepass "$pass" \
        -alias kafka -dname "CN=kafka" -keyalg RSA -keysize 2048 -validity "$DAYS" \
        -ext "SAN=$NAMES"
    "$KEYTOOL" -certreq -keystore keystore.p12 -storetype PKCS12 -storepass "$pass" \
        -alias kafka -file broker.csr
    "$KEYTOOL" -gencert -keystore ca.p12 -storetype PKCS12 -storepass "$pass" -alias ca \
        -infile broker.csr -outfile broker.pem -rfc -validity "$DAYS" -ext "SAN=$NAMES" \
        -ext ku:c=digitalSignature,keyEncipherment -ext eku=serverAuth,clientAuth
    "$KEYTOOL" -importcert -noprompt -keystore keystore.p12 -storetype PKCS12 \
        -storepass "$pass" -alias ca -file "$CA_DIR/ca.pem"
    "$KEYTOOL" -importcert -noprompt -keystore keystore.p12 -storetype PKCS12 \
        -storepass "$pass" -alias kafka -file broker.pem
    "$KEYTOOL" -delete -keystore keystore.p12 -storetype PKCS12 -storepass "$pass" -alias ca
    "$KEYTOOL" -importcert -noprompt -keystore truststore.p12 -storetype PKCS12 \
        -storepass "$pass" -alias ca -file "$CA_DIR/ca.pem"
    rm -f ca.p12 broker.csr broker.pem
    chmod 644 "$CA_DIR/ca.pem"
fi

cat > kafka_jaas.conf <<JAAS
KafkaServer {
  org.apache.kafka.common.security.plain.PlainLoginModule required
    username="admin" password="$KAFKA_ADMIN_PASSWORD" user_admin="$KAFKA_ADMIN_PASSWORD";
  org.apache.kafka.common.security.scram.ScramLoginModule required;
};
JAAS
cat > admin.properties <<PROPS
security.protocol=SASL_SSL
sasl.mechanism=PLAIN
sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="admin" password="$KAFKA_ADMIN_PASSWORD";
ssl.truststore.location=$SECRETS/truststore.p12
ssl.truststore.type=PKCS12
ssl.truststore.password=$pass
PROPS
echo "kafka-certs: TLS material and credentials ready in $SECRETS (CA: $CA_DIR/ca.pem)"
