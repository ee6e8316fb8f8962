//! PROTOCOL.md §1: connecting, tokens and the Origin check.

use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};
use sockets_tests::client::{Client, Refused};
use sockets_tests::server::{Server, ServerConfig, fixture, now, sign, token, token_with};

fn bearer(token: &str) -> Vec<(&'static str, String)> {
    vec![("authorization", format!("Bearer {token}"))]
}

async fn refusal(server: &Server, headers: &[(&str, String)], query: &str) -> (u16, Value) {
    match Client::try_connect(server, headers, query).await {
        Err(Refused::Http(status, body)) => (status, body),
        Err(Refused::Other(err)) => panic!("unexpected failure: {err}"),
        Ok((_, connected)) => panic!("the connection was accepted: {connected}"),
    }
}

async fn assert_unauthorized(server: &Server, headers: &[(&str, String)], query: &str) {
    let (status, body) = refusal(server, headers, query).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "unauthorized", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_valid_header_token_connects_and_the_first_frame_is_connected() {
    let server = Server::in_process().await;
    let (_client, connected) = Client::connect(&server, &token("s_1", "student")).await;
    assert_eq!(connected["event"], "connected");
    assert_eq!(connected["data"]["userId"], "s_1");
    assert_eq!(connected["data"]["role"], "student");
    assert!(
        connected["data"]["connectionId"]
            .as_str()
            .is_some_and(|id| !id.is_empty())
    );
    assert!(
        connected.get("id").is_none(),
        "only pushes carry an id: {connected}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_query_parameter_works_and_role_defaults_to_user() {
    let server = Server::in_process().await;
    let token = token_with(json!({"sub": "u_9", "exp": now() + 600}));
    let (_client, connected) = Client::try_connect(&server, &[], &format!("?access_token={token}"))
        .await
        .unwrap();
    assert_eq!(connected["data"]["userId"], "u_9");
    assert_eq!(connected["data"]["role"], "user");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_tokens_get_401_before_the_upgrade() {
    let server = Server::in_process().await;
    let exp = now() + 600;
    let hs_wrong_key = EncodingKey::from_secret(b"another secret");
    let rsa_public = std::fs::read(fixture("rsa_public.pem")).unwrap();
    let rsa_private =
        EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa_private.pem")).unwrap()).unwrap();
    let unsigned_header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0"; // {"alg":"none","typ":"JWT"}
    let none_token = format!(
        "{unsigned_header}.{}.",
        base64_url(&json!({"sub": "s_1", "exp": exp}).to_string())
    );
    let cases = [
        ("no token", vec![], String::new()),
        (
            "expired",
            bearer(&token_with(json!({"sub": "s_1", "exp": now() - 120}))),
            String::new(),
        ),
        (
            "wrong signature",
            bearer(&sign(
                Algorithm::HS256,
                &hs_wrong_key,
                &json!({"sub": "s_1", "exp": exp}),
            )),
            String::new(),
        ),
        ("alg none", bearer(&none_token), String::new()),
        (
            "HS256 signed with the RSA public key",
            bearer(&sign(
                Algorithm::HS256,
                &EncodingKey::from_secret(&rsa_public),
                &json!({"sub": "s_1", "exp": exp}),
            )),
            String::new(),
        ),
        (
            "RS256 not on the allow-list",
            bearer(&sign(
                Algorithm::RS256,
                &rsa_private,
                &json!({"sub": "s_1", "exp": exp}),
            )),
            String::new(),
        ),
        (
            "missing sub",
            bearer(&token_with(json!({"exp": exp}))),
            String::new(),
        ),
        (
            "empty sub",
            bearer(&token_with(json!({"sub": "", "exp": exp}))),
            String::new(),
        ),
        (
            "missing exp",
            bearer(&token_with(json!({"sub": "s_1"}))),
            String::new(),
        ),
        (
            "exp as a string",
            bearer(&token_with(json!({"sub": "s_1", "exp": exp.to_string()}))),
            String::new(),
        ),
        (
            "not valid yet",
            bearer(&token_with(
                json!({"sub": "s_1", "exp": exp, "nbf": now() + 300}),
            )),
            String::new(),
        ),
        (
            "not Bearer",
            vec![(
                "authorization",
                format!("Basic {}", token("s_1", "student")),
            )],
            String::new(),
        ),
        ("garbage", bearer("not.a.jwt"), String::new()),
        ("bad query token", vec![], "?access_token=nope".to_owned()),
    ];
    for (what, headers, query) in cases {
        let (status, body) = refusal(&server, &headers, &query).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["error"]["code"], "unauthorized", "{what}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_present_but_invalid_header_is_not_rescued_by_the_query() {
    let server = Server::in_process().await;
    let query = format!("?access_token={}", token("s_1", "student"));
    assert_unauthorized(&server, &bearer("invalid"), &query).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_bearer_scheme_is_case_insensitive() {
    let server = Server::in_process().await;
    let headers = [(
        "authorization",
        format!("bEaReR {}", token("s_1", "student")),
    )];
    assert!(Client::try_connect(&server, &headers, "").await.is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn issuer_and_audience_are_checked_when_configured() {
    let config = ServerConfig::default()
        .env("SOCKETS_JWT_ISSUER", "marketplace")
        .env("SOCKETS_JWT_AUDIENCE", "sockets");
    let server = Server::in_process_with(config).await;
    let exp = now() + 600;
    let good =
        token_with(json!({"sub": "s_1", "exp": exp, "iss": "marketplace", "aud": "sockets"}));
    assert!(
        Client::try_connect(&server, &bearer(&good), "")
            .await
            .is_ok()
    );
    for claims in [
        json!({"sub": "s_1", "exp": exp, "iss": "marketplace", "aud": "other"}),
        json!({"sub": "s_1", "exp": exp, "iss": "marketplace"}),
        json!({"sub": "s_1", "exp": exp, "iss": "evil", "aud": "sockets"}),
        json!({"sub": "s_1", "exp": exp, "aud": "sockets"}),
    ] {
        assert_unauthorized(&server, &bearer(&token_with(claims)), "").await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rs256_and_es256_tokens_verify_with_a_configured_public_key() {
    let exp = now() + 600;
    let claims = json!({"sub": "c_1", "role": "consultant", "exp": exp});
    for (public, private, alg) in [
        ("rsa_public.pem", "rsa_private.pem", Algorithm::RS256),
        ("ec_public.pem", "ec_private.pem", Algorithm::ES256),
    ] {
        let config = ServerConfig::default().env(
            "SOCKETS_JWT_PUBLIC_KEY",
            fixture(public).display().to_string(),
        );
        let server = Server::in_process_with(config).await;
        let pem = std::fs::read(fixture(private)).unwrap();
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
            _ => EncodingKey::from_ec_pem(&pem).unwrap(),
        };
        let (_client, connected) = Client::connect(&server, &sign(alg, &key, &claims)).await;
        assert_eq!(connected["data"]["userId"], "c_1");
        // The HS256 secret still works (default list: HS256 plus what the key implies).
        assert!(
            Client::try_connect(&server, &bearer(&token("s_1", "student")), "")
                .await
                .is_ok()
        );
        // Signing HS256 with the public key is the classic confusion attack.
        let public_pem = std::fs::read(fixture(public)).unwrap();
        let forged = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(&public_pem),
            &claims,
        );
        assert_unauthorized(&server, &bearer(&forged), "").await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_algorithm_allow_list_is_explicit() {
    let config = ServerConfig::default().env("SOCKETS_JWT_ALGORITHMS", "HS384");
    let server = Server::in_process_with(config).await;
    assert_unauthorized(&server, &bearer(&token("s_1", "student")), "").await;
    let hs384 = sign(
        Algorithm::HS384,
        &EncodingKey::from_secret(sockets_tests::server::SECRET.as_bytes()),
        &json!({"sub": "s_1", "exp": now() + 600}),
    );
    assert!(
        Client::try_connect(&server, &bearer(&hs384), "")
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disallowed_origin_gets_403_whatever_the_token() {
    let config = ServerConfig::default().env(
        "SOCKETS_ALLOWED_ORIGINS",
        "https://app.example, https://admin.example",
    );
    let server = Server::in_process_with(config).await;
    let good = token("s_1", "student");
    let with_origin = |origin: &str| {
        let mut headers = bearer(&good);
        headers.push(("origin", origin.to_owned()));
        headers
    };
    let (status, body) = refusal(&server, &with_origin("https://evil.example"), "").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    let (status, _) = refusal(
        &server,
        &[("origin", "https://evil.example".to_owned())],
        "",
    )
    .await;
    assert_eq!(status, 403, "the Origin check comes before the token");
    assert!(
        Client::try_connect(&server, &with_origin("https://admin.example"), "")
            .await
            .is_ok()
    );
    assert!(
        Client::try_connect(&server, &bearer(&good), "")
            .await
            .is_ok(),
        "no Origin: not a browser"
    );
}

fn base64_url(text: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = text.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_never_reach_the_log_or_an_error_body() {
    let server = Server::start().await;
    let expired = token_with(json!({"sub": "s_1", "role": "student", "exp": now() - 3600}));
    let forged = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(b"not-the-server-secret"),
        &json!({"sub": "s_1", "role": "student", "exp": now() + 600}),
    );
    let valid = token("s_1", "student");
    for bad in [&expired, &forged] {
        let (status, body) = refusal(&server, &bearer(bad), "").await;
        assert_eq!(status, 401, "{body}");
        assert!(!body.to_string().contains(signature(bad)), "{body}");
        let (status, body) = refusal(&server, &[], &format!("?access_token={bad}")).await;
        assert_eq!(status, 401, "{body}");
        assert!(!body.to_string().contains(signature(bad)), "{body}");
    }
    let (mut client, _) = Client::try_connect(&server, &[], &format!("?access_token={valid}"))
        .await
        .unwrap();
    client
        .send(&json!({"event": "refreshToken", "data": {"token": expired}, "ack": 1}))
        .await;
    let reply = client.recv().await;
    assert_eq!(reply["error"]["code"], "unauthorized", "{reply}");
    assert!(!reply.to_string().contains(signature(&expired)), "{reply}");

    let log = server.log();
    assert!(
        log.contains("s_1"),
        "the connection is logged, so the log is the one to search:\n{log}"
    );
    for token in [&expired, &forged, &valid] {
        assert!(
            !log.contains(signature(token)),
            "a token's signature is in the log:\n{log}"
        );
    }
}

/// A JWT's signature, the part that must never be repeated anywhere.
fn signature(token: &str) -> &str {
    token.rsplit('.').next().unwrap()
}
