//! Token keys from a JWKS URL (PROTOCOL §1 v1.1) against a local JWKS
//! server that rotates its keys, goes down, and counts how often it is
//! asked: a rotated-in key works at once, a rotated-out key stops working,
//! forged `kid`s cannot make the service hammer the endpoint, and the
//! endpoint down keeps the cached keys.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use sockets_tests::client::{Client, Refused, http};
use sockets_tests::server::{Server, ServerConfig, fixture, now};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const ISSUER: &str = "https://id.example";

/// What the JWKS server answers: a key set, or an error status.
#[derive(Clone)]
enum Serving {
    Keys(Value),
    Down,
}

/// A JWKS endpoint on 127.0.0.1 that answers what `serving` holds.
struct JwksServer {
    url: String,
    serving: Arc<Mutex<Serving>>,
    requests: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(initial: Value) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().unwrap()
        );
        let serving = Arc::new(Mutex::new(Serving::Keys(initial)));
        let requests = Arc::new(AtomicUsize::new(0));
        let (state, count) = (Arc::clone(&serving), Arc::clone(&requests));
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (state, count) = (Arc::clone(&state), Arc::clone(&count));
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buffer = [0; 1024];
                    while !request.ends_with(b"\r\n\r\n") {
                        match stream.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buffer[..n]),
                        }
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    let serving = state.lock().unwrap().clone();
                    let (status, body) = match serving {
                        Serving::Keys(keys) => ("200 OK", keys.to_string()),
                        Serving::Down => ("503 Service Unavailable", "down".to_owned()),
                    };
                    let answer = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                });
            }
        });
        JwksServer {
            url,
            serving,
            requests,
        }
    }

    fn serve(&self, serving: Serving) {
        *self.serving.lock().unwrap() = serving;
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// The fixture key `name` (`rsa` or `ec`) as a JWK with `kid`.
fn jwk(name: &str, kid: &str) -> Value {
    let mut key: Value = serde_json::from_slice(
        &std::fs::read(fixture(&format!("{name}_public.jwk.json"))).unwrap(),
    )
    .unwrap();
    key["kid"] = json!(kid);
    key
}

fn key_set(keys: &[Value]) -> Value {
    json!({ "keys": keys })
}

/// A token for `sub` signed with fixture key `name` under `kid`.
fn signed(name: &str, kid: &str, alg: Algorithm, sub: &str, issuer: &str) -> String {
    let pem = std::fs::read(fixture(&format!("{name}_private.pem"))).unwrap();
    let key = match name {
        "rsa" => EncodingKey::from_rsa_pem(&pem).unwrap(),
        _ => EncodingKey::from_ec_pem(&pem).unwrap(),
    };
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    let claims = json!({"sub": sub, "role": "student", "exp": now() + 600, "iss": issuer});
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

/// The HTTP status a connection with `token` gets (101 when it connects).
async fn connect_status(server: &Server, token: &str) -> u16 {
    match Client::try_connect(server, &[("authorization", format!("Bearer {token}"))], "").await {
        Ok((client, _)) => {
            client.close().await;
            101
        }
        Err(Refused::Http(status, _)) => status,
        Err(Refused::Other(err)) => panic!("connect failed: {err}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn jwks_keys_rotate_and_survive_an_outage() {
    let jwks = JwksServer::start(key_set(&[jwk("rsa", "k1")])).await;
    let server = Server::in_process_with(
        ServerConfig::default()
            .env("SOCKETS_JWT_JWKS_URL", &jwks.url)
            .env("SOCKETS_JWT_JWKS_REFETCH", "2")
            .env("SOCKETS_JWT_ISSUER", ISSUER),
    )
    .await;
    let k1 = signed("rsa", "k1", Algorithm::RS256, "s_1", ISSUER);
    assert_eq!(
        connect_status(&server, &k1).await,
        101,
        "the published key works"
    );
    // Tokens of the shared secret keep working beside the JWKS.
    let hs256 = sockets_tests::server::token_with(
        json!({"sub": "s_2", "role": "student", "exp": now() + 600, "iss": ISSUER}),
    );
    assert_eq!(connect_status(&server, &hs256).await, 101);

    // The identity provider rotates: k2 (EC) in, k1 out. A token under k2
    // fetches the set again at once (the last fetch is over 2 s old).
    jwks.serve(Serving::Keys(key_set(&[jwk("ec", "k2")])));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let k2 = signed("ec", "k2", Algorithm::ES256, "s_1", ISSUER);
    assert_eq!(
        connect_status(&server, &k2).await,
        101,
        "a rotated-in key works at once"
    );
    assert_eq!(
        connect_status(&server, &k1).await,
        401,
        "a rotated-out key stops working"
    );

    // Forged kids: at most one fetch per refetch interval, whatever comes.
    let before = jwks.requests();
    for n in 0..20 {
        let forged = signed(
            "rsa",
            &format!("forged-{n}"),
            Algorithm::RS256,
            "s_1",
            ISSUER,
        );
        assert_eq!(connect_status(&server, &forged).await, 401);
    }
    assert!(
        jwks.requests() <= before + 1,
        "20 unknown kids caused {} fetches",
        jwks.requests() - before
    );

    // The key set's algorithm binds the key: k2 is ES256, not RS256.
    let confused = signed("rsa", "k2", Algorithm::RS256, "s_1", ISSUER);
    assert_eq!(connect_status(&server, &confused).await, 401);
    // A key of the set does not verify a token of another issuer.
    let elsewhere = signed("ec", "k2", Algorithm::ES256, "s_1", "https://evil.example");
    assert_eq!(connect_status(&server, &elsewhere).await, 401);

    // The endpoint goes down: an unknown kid fetches, fails, and the cached
    // key keeps working; readiness stays (keys are loaded), and admins see
    // why the last fetch failed.
    jwks.serve(Serving::Down);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let unknown = signed("rsa", "k3", Algorithm::RS256, "s_1", ISSUER);
    let before = jwks.requests();
    assert_eq!(connect_status(&server, &unknown).await, 401);
    assert_eq!(jwks.requests(), before + 1, "the unknown kid fetched once");
    assert_eq!(
        connect_status(&server, &k2).await,
        101,
        "cached keys outlive the outage"
    );
    let admin_token = sockets_tests::server::token_with(
        json!({"sub": "ops", "role": "admin", "exp": now() + 600, "iss": ISSUER}),
    );
    let admin = [("authorization", format!("Bearer {admin_token}"))];
    let ready = http(&server, "GET", "/readyz", &admin, b"").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    let check = &ready.json()["checks"]["jwks"];
    assert_eq!(check["keys"], 1, "{check}");
    assert!(check["error"].as_str().unwrap().contains("503"), "{check}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_jwks_that_never_answered_leaves_the_server_up_and_unready() {
    let jwks = JwksServer::start(json!({"keys": []})).await;
    jwks.serve(Serving::Down);
    let server = Server::in_process_with(
        ServerConfig::default()
            .env("SOCKETS_JWT_JWKS_URL", &jwks.url)
            .env("SOCKETS_JWT_JWKS_REFETCH", "1")
            .env("SOCKETS_JWT_ISSUER", ISSUER),
    )
    .await;
    let ready = http(&server, "GET", "/readyz", &[], b"").await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert_eq!(ready.json()["checks"]["jwks"]["status"], "degraded");
    // Once the endpoint answers, the next token under a new kid loads it.
    jwks.serve(Serving::Keys(key_set(&[jwk("rsa", "k1")])));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let k1 = signed("rsa", "k1", Algorithm::RS256, "s_1", ISSUER);
    assert_eq!(connect_status(&server, &k1).await, 101);
    let ready = http(&server, "GET", "/readyz", &[], b"").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
}
