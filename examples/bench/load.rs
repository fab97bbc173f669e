//! The load generator's client: one HTTP/1.1 connection per caller, driven by hyper directly.
//!
//! The generator shares the two cores with the service it measures, so every cycle it spends
//! is taken from the service. reqwest (still used for the connect flows, which follow
//! redirects and post forms) costs several times more per request than a bare connection:
//! pool checkout, URL parsing and conversion, its timeout and redirect layers. Requests here
//! are plain `GET`s in origin form on a connection the caller owns.

use std::net::{SocketAddr, ToSocketAddrs};

use axum::body::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::{handshake, SendRequest};
use hyper::header::{AUTHORIZATION, CONNECTION, HOST};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use reqwest::header::HeaderValue;
use reqwest::Url;
use tokio::net::TcpStream;

/// Where the requests of a load go: one server, any number of paths on it.
#[derive(Debug, Clone)]
pub struct Target {
    pub address: SocketAddr,
    pub host: HeaderValue,
    pub paths: Vec<Uri>,
}

impl Target {
    /// The target of `urls`, which must all be `http://` URLs of one server.
    pub fn of(urls: &[Url]) -> Result<Self, String> {
        let first = urls.first().ok_or("no URLs")?;
        let host = first.host_str().ok_or("URL without host")?;
        let port = first.port_or_known_default().ok_or("URL without port")?;
        let address = (host, port)
            .to_socket_addrs()
            .map_err(|err| format!("resolve {host}: {err}"))?
            .next()
            .ok_or("host resolves to nothing")?;
        let paths = urls
            .iter()
            .map(|url| {
                let mut path = url.path().to_owned();
                if let Some(query) = url.query() {
                    path.push('?');
                    path.push_str(query);
                }
                path.parse::<Uri>().map_err(|err| err.to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let host = HeaderValue::from_str(&format!("{host}:{port}")).map_err(|e| e.to_string())?;
        Ok(Self {
            address,
            host,
            paths,
        })
    }
}

/// One keep-alive connection to the target's server.
pub struct Connection {
    sender: SendRequest<Empty<Bytes>>,
    /// The last response said `Connection: close` (the service at its connection limit): as
    /// any HTTP client does, the caller opens a new connection for its next request.
    closing: bool,
}

impl Connection {
    pub async fn open(address: SocketAddr) -> Result<Self, String> {
        let stream = TcpStream::connect(address)
            .await
            .map_err(|err| format!("connect: {err}"))?;
        stream
            .set_nodelay(true)
            .map_err(|err| format!("nodelay: {err}"))?;
        let (sender, connection) = handshake(TokioIo::new(stream))
            .await
            .map_err(|err| format!("handshake: {err}"))?;
        tokio::spawn(connection);
        Ok(Self {
            sender,
            closing: false,
        })
    }

    /// `GET path` with an optional `Authorization`; the status and the whole body.
    pub async fn get(
        &mut self,
        target: &Target,
        path: &Uri,
        auth: Option<&HeaderValue>,
    ) -> Result<(StatusCode, Bytes), String> {
        let mut request = Request::get(path.clone()).header(HOST, target.host.clone());
        if let Some(auth) = auth {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        let request = request
            .body(Empty::new())
            .map_err(|err| format!("request: {err}"))?;
        self.sender
            .ready()
            .await
            .map_err(|err| format!("connection: {err}"))?;
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(|err| format!("request: {err}"))?;
        let status = response.status();
        self.closing = response
            .headers()
            .get(CONNECTION)
            .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"close"));
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|err| format!("body: {err}"))?
            .to_bytes();
        Ok((status, body))
    }

    /// The service closes this connection after the response just read.
    pub fn is_closing(&self) -> bool {
        self.closing
    }
}
