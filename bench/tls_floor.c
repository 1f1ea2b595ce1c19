/* The raw TLS floor in C (bench/daemon_wire.py --sweep, round 47): OpenSSL's own throughput on a loopback TCP
 * connection between two processes of this box, with no Python between the records and the bytes, next to the same
 * exchange in plaintext (raw TCP in C). The same exchange as daemon_wire.py's `tcp_figures`: an upload is one
 * request header then `size` bytes written in 4 MiB calls (SSL_write: OpenSSL cuts them into 16 KiB records), read
 * by the server into one reused 4 MiB buffer and answered with one byte; a download is one request header, then the
 * server writes `size` bytes and the client reads them into one reused 4 MiB buffer. TLS is the loopback PKI's
 * (the server's certificate and key, the client checks it against the CA and the name "localhost"): TLS 1.3 and
 * the cipher both ends choose by default, as Python's ssl and the daemon's side port get them.
 *
 *   tls_floor tls|tcp CERT KEY CA SIZE REPS
 *
 * prints one line a repetition: "up GB/s, down GB/s, then CPU seconds a GiB: the client's and the server's in the upload,
 * the client's and the server's in the download" (each process's own CPU clock; the server's asked before and after
 * each phase, outside its timing). Build: cc -O2 tls_floor.c -o tls_floor -lssl -lcrypto
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (4u << 20)

static int use_tls;
static void tune(SSL_CTX *ctx, int ahead) {
  if (ahead) SSL_CTX_set_read_ahead(ctx, 1); /* a record's header and body in one read, and what else is there */
}

static void die(const char *what) {
  fprintf(stderr, "tls_floor: %s\n", what);
  ERR_print_errors_fp(stderr);
  exit(1);
}

typedef struct {
  int fd;
  SSL *ssl;
} conn_t;

static size_t io_write(conn_t *c, const char *p, size_t n) {
  if (!use_tls) {
    ssize_t k = write(c->fd, p, n);
    if (k <= 0) die("write");
    return (size_t)k;
  }
  size_t k = 0;
  if (!SSL_write_ex(c->ssl, p, n, &k)) die("SSL_write");
  return k;
}

static size_t io_read(conn_t *c, char *p, size_t n) {
  if (!use_tls) {
    ssize_t k = read(c->fd, p, n);
    if (k <= 0) die("read");
    return (size_t)k;
  }
  size_t k = 0;
  if (!SSL_read_ex(c->ssl, p, n, &k)) die("SSL_read");
  return k;
}

static void write_all(conn_t *c, const char *p, size_t n) {
  while (n) {
    size_t k = io_write(c, p, n);
    p += k;
    n -= k;
  }
}

static void read_all(conn_t *c, char *p, size_t n) {
  while (n) {
    size_t k = io_read(c, p, n);
    p += k;
    n -= k;
  }
}

static double clock_of(clockid_t which) {
  struct timespec t;
  clock_gettime(which, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

static double now(void) { return clock_of(CLOCK_MONOTONIC); }
static double cpu(void) { return clock_of(CLOCK_PROCESS_CPUTIME_ID); }

/* Serves requests until the client closes: 'U' + u64 size (read, answer one byte), 'D' + u64 size (send), 'C' (its
 * CPU seconds so far, a double). */
static void serve(conn_t *c, char *buf) {
  for (;;) {
    char head[9];
    size_t k = 0;
    if (use_tls) {
      if (!SSL_read_ex(c->ssl, head, 1, &k)) return;
    } else if (read(c->fd, head, 1) <= 0) {
      return;
    }
    read_all(c, head + 1, 8);
    uint64_t n;
    memcpy(&n, head + 1, 8);
    if (head[0] == 'C') {
      double t = cpu();
      write_all(c, (const char *)&t, sizeof t);
    } else if (head[0] == 'U') {
      for (uint64_t left = n; left;) {
        size_t got = io_read(c, buf, left < CHUNK ? left : CHUNK);
        left -= got;
      }
      write_all(c, "k", 1);
    } else {
      for (uint64_t left = n; left;) {
        size_t part = left < CHUNK ? left : CHUNK;
        write_all(c, buf, part);
        left -= part;
      }
    }
  }
}

static double server_cpu(conn_t *c) {
  char head[9] = {'C'};
  double t;
  write_all(c, head, 9);
  read_all(c, (char *)&t, sizeof t);
  return t;
}

int main(int argc, char **argv) {
  if (argc != 7) die("usage: tls_floor tls|tcp CERT KEY CA SIZE REPS");
  use_tls = strncmp(argv[1], "tls", 3) == 0;
  int ahead = strcmp(argv[1], "tls-ahead") == 0;
  uint64_t size = strtoull(argv[5], NULL, 10);
  int reps = atoi(argv[6]);
  char *buf = malloc(CHUNK);
  memset(buf, 0x5a, CHUNK);

  int lfd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t alen = sizeof addr;
  if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) || listen(lfd, 1) ||
      getsockname(lfd, (struct sockaddr *)&addr, &alen))
    die("listen");
  fflush(stdout);
  pid_t child = fork();
  if (child == 0) { /* the server */
    conn_t c = {accept(lfd, NULL, NULL), NULL};
    int one = 1;
    setsockopt(c.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (use_tls) {
      SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
      if (!ctx || SSL_CTX_use_certificate_chain_file(ctx, argv[2]) != 1 ||
          SSL_CTX_use_PrivateKey_file(ctx, argv[3], SSL_FILETYPE_PEM) != 1)
        die("server context");
      tune(ctx, ahead);
      c.ssl = SSL_new(ctx);
      SSL_set_fd(c.ssl, c.fd);
      if (SSL_accept(c.ssl) != 1) die("SSL_accept");
    }
    serve(&c, buf);
    _exit(0);
  }
  close(lfd);
  conn_t c = {socket(AF_INET, SOCK_STREAM, 0), NULL};
  if (connect(c.fd, (struct sockaddr *)&addr, sizeof addr)) die("connect");
  int one = 1;
  setsockopt(c.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (use_tls) {
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx || SSL_CTX_load_verify_locations(ctx, argv[4], NULL) != 1) die("client context");
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    tune(ctx, ahead);
    c.ssl = SSL_new(ctx);
    SSL_set_fd(c.ssl, c.fd);
    SSL_set_tlsext_host_name(c.ssl, "localhost");
    SSL_set1_host(c.ssl, "localhost");
    if (SSL_connect(c.ssl) != 1) die("SSL_connect");
  }
  double gib = size / 1073741824.0;
  for (int r = 0; r < reps; r++) {
    char head[9];
    double s0 = server_cpu(&c), c0 = cpu();
    head[0] = 'U';
    memcpy(head + 1, &size, 8);
    double t0 = now();
    write_all(&c, head, 9);
    for (uint64_t left = size; left;) {
      size_t part = left < CHUNK ? left : CHUNK;
      write_all(&c, buf, part);
      left -= part;
    }
    read_all(&c, head, 1);
    double up = size / (now() - t0) / 1e9;
    double c1 = cpu(), s1 = server_cpu(&c);
    head[0] = 'D';
    t0 = now();
    write_all(&c, head, 9);
    for (uint64_t left = size; left;) left -= io_read(&c, buf, left < CHUNK ? left : CHUNK);
    double down = size / (now() - t0) / 1e9;
    double c2 = cpu(), s2 = server_cpu(&c);
    printf("%.4f %.4f %.4f %.4f %.4f %.4f\n", up, down, (c1 - c0) / gib, (s1 - s0) / gib, (c2 - c1) / gib, (s2 - s1) / gib);
    fflush(stdout);
  }
  if (use_tls) SSL_shutdown(c.ssl);
  close(c.fd);
  waitpid(child, NULL, 0);
  if (use_tls) {
    const char *cipher = SSL_get_cipher_name(c.ssl);
    fprintf(stderr, "cipher %s %s\n", SSL_get_version(c.ssl), cipher ? cipher : "?");
  }
  return 0;
}
