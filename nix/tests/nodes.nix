# Node configuration shared by the VM tests (NixOS modules).
{
  pkgs,
  package,
  tls,
}: {
  # The outside world: trusts the test CA, resolves the public name to the node that
  # serves HTTPS, and has the end-to-end probe.
  client = server: {nodes, ...}: {
    networking.hosts.${nodes.${server}.networking.primaryIPAddress} = [tls.domain];
    security.pki.certificateFiles = [tls.ca];
    environment.etc."pageviews-test/ca.pem".source = tls.ca;
    environment.systemPackages = [package pkgs.curl];
  };

  # `pageviews-sql 'SELECT …'` on a data host: psql as the superuser on the pageviews
  # database, unaligned tuples only, stops on the first error.
  sql = {config, ...}: {
    environment.systemPackages = [
      (pkgs.writeShellScriptBin "pageviews-sql" ''
        exec ${pkgs.util-linux}/bin/runuser -u postgres -- \
          ${config.services.postgresql.package}/bin/psql -X -q -t -A \
          -v ON_ERROR_STOP=1 -d ${config.services.pageviews.database.name} -c "$1"
      '')
    ];
  };

  # Enough memory for PostgreSQL + RabbitMQ (Erlang) + the app on one VM.
  sized = memorySize: {
    virtualisation.memorySize = memorySize;
    virtualisation.cores = 2;
  };

  # Tools the scripts call besides what NixOS always ships (curl, nc, getent are there).
  tools = {
    environment.systemPackages = [pkgs.curl pkgs.iproute2];
  };
}
