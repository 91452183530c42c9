# Fixed, test-only passwords for the split tests: the app host and the data host must
# read the same values, so they are store files here (never do that with a real secret).
# URL-safe, as the module requires.
{pkgs}: let
  value = name: "vmtest-${name}-0123456789abcdef";
  file = name: "${pkgs.writeText "pageviews-vm-test-${name}" (value name)}";
in {
  inherit value;
  database = {
    owner = file "db-owner";
    app = file "db-app";
    worker = file "db-worker";
  };
  rabbitmq = {
    app = file "amqp-app";
    worker = file "amqp-worker";
  };
  # vm-cluster: the Erlang cookie every broker shares.
  erlangCookie = file "erlang-cookie";
}
