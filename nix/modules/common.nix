# Values derived from services.pageviews, shared by the module's files (not a module).
{
  lib,
  cfg,
}: rec {
  hasRole = role: builtins.elem role cfg.roles;
  localApp = hasRole "app";
  localData = hasRole "data";
  localProxy = hasRole "proxy";
  # A RabbitMQ cluster (rabbitmq.cluster.nodes) runs on "broker" hosts; without one the
  # data host runs the single broker.
  clustered = cfg.rabbitmq.cluster.nodes != [];
  localBroker = hasRole "broker" || (localData && !clustered);
  brokerAddresses = map (n: n.address) cfg.rabbitmq.cluster.nodes;
  # Every app host, for the nginx upstream (passive failover over all of them).
  inherit (cfg.network) appAddresses;
  # The app and the database/broker live on different hosts: TCP with passwords.
  splitData = localApp != localData;
  # The proxy and the app live on different hosts: the app listens on TCP.
  splitApp = localApp != localProxy;

  secretsDir = "/var/lib/pageviews-secrets";
  appSocket = "/run/pageviews-app/app.sock";

  # System users, which are also the PostgreSQL roles and the RabbitMQ users.
  users = {
    owner = cfg.database.owner;
    app = "pageviews-app";
    worker = "pageviews-worker";
  };

  # Broker password files, the generated default filled in where the option is null.
  amqpPasswordFile = who:
    if cfg.rabbitmq.passwordFiles.${who} != null
    then cfg.rabbitmq.passwordFiles.${who}
    else "${secretsDir}/amqp-${who}";
  generatedSecrets = lib.filter (who: cfg.rabbitmq.passwordFiles.${who} == null) ["app" "worker"];

  isIPv6 = addr: lib.hasInfix ":" addr;
  # An address as the host part of a URL.
  urlHost = addr:
    if isIPv6 addr
    then "[${addr}]"
    else addr;
  # An address as a one-host CIDR (for pg_hba).
  hostCidr = addr:
    if isIPv6 addr
    then "${addr}/128"
    else "${addr}/32";
  # An nftables rule accepting TCP ports from a list of addresses (IPv4 and IPv6 apart).
  nftAccept = addrs: ports: let
    v4 = lib.filter (a: !isIPv6 a) addrs;
    v6 = lib.filter isIPv6 addrs;
    portSet = "{ ${lib.concatMapStringsSep ", " toString ports} }";
    rule = family: list: lib.optionalString (list != []) "${family} saddr { ${lib.concatStringsSep ", " list} } tcp dport ${portSet} accept\n";
  in
    rule "ip" v4 + rule "ip6" v6;
}
