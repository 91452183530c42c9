# Throwaway TLS material for the VM tests only, made at build time: a CA and a leaf
# certificate for `pageviews.test` (ECDSA P-256). The keys land in the world-readable
# Nix store, which is fine for a test and never done for a real deployment (the module
# takes key *paths as strings* for that reason).
{pkgs}: let
  domain = "pageviews.test";
  material =
    pkgs.runCommand "pageviews-vm-test-tls" {
      nativeBuildInputs = [pkgs.openssl];
    } ''
      mkdir -p "$out"
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -days 3650 -subj "/CN=pageviews VM test CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout ca.key -out "$out/ca.pem"
      openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -subj "/CN=${domain}" -keyout "$out/key.pem" -out leaf.csr
      cat > leaf.ext <<'EXT'
      subjectAltName = DNS:${domain}
      basicConstraints = critical, CA:FALSE
      keyUsage = critical, digitalSignature
      extendedKeyUsage = serverAuth
      EXT
      openssl x509 -req -in leaf.csr -CA "$out/ca.pem" -CAkey ca.key -set_serial 2 \
        -days 3650 -extfile leaf.ext -out "$out/cert.pem"
      openssl verify -CAfile "$out/ca.pem" "$out/cert.pem"
    '';
in {
  inherit domain;
  ca = "${material}/ca.pem";
  cert = "${material}/cert.pem";
  key = "${material}/key.pem";
}
