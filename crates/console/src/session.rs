//! Signing in and out, the session a request carries, and the checks every form passes.
//!
//! The session is the `pcr_` token itself, in a cookie the page's script cannot read
//! (`HttpOnly`) and no other site's request carries (`SameSite=Strict`); each request
//! authenticates it afresh, as the API does a bearer token, so a revoked token signs its
//! sessions out. Every form carries the session's form token; the sign-in form, before there is
//! a session, carries a random value that must match a cookie of its own (a double submit).

use askama::Template;
use axum::extract::{Form, FromRequest, FromRequestParts, RawPathParams, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use picloud_api::{ApiState, Caller, ErrorCode, authenticate};
use picloud_core::token::{API_TOKEN_PREFIX, generate_api_token};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::pages::{ErrorPage, render};

/// The cookie that holds the session's token.
const SESSION: &str = "picloud_session";
/// The cookie of the sign-in form's double submit.
const LOGIN: &str = "picloud_login";

/// A signed-in request: who it acts as on the page's app, and its form token.
#[derive(Debug)]
pub(crate) struct Session {
    /// The caller the session's token authenticates as, on the app the path names.
    pub caller: Caller,
    /// What every form of the page carries.
    pub form_token: String,
    token: String,
}

impl Session {
    /// The session's API token.
    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    /// The 403 page, unless `given` is this session's form token.
    pub(crate) fn refuse_form(&self, state: &ApiState, given: &str) -> Option<Response> {
        (!state.config.node.token_key.is_form_token(&self.token, given)).then(forged)
    }
}

/// The refusal of a form without its token (or that is no form at all).
fn forged() -> Response {
    ErrorPage::response(
        StatusCode::FORBIDDEN,
        "This form's CSRF token is missing or wrong: reload the page and try again.",
    )
}

/// A posted form; a body that is none is refused like a form without its token, since it has
/// none.
#[derive(Debug)]
pub(crate) struct Posted<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Posted<T> {
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Form::<T>::from_request(request, state).await {
            Ok(Form(form)) => Ok(Posted(form)),
            Err(_) => Err(forged()),
        }
    }
}

/// The value of cookie `name`.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|h| h.to_str().ok())
        .flat_map(|h| h.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find_map(|(k, v)| (k == name).then_some(v))
}

/// Whether the browser reached the console on a loopback address (its cookies may then go
/// without `Secure`, which needs HTTPS); a request a proxy forwarded from HTTPS never counts,
/// whatever `Host` the proxy sent on.
fn on_loopback(headers: &HeaderMap) -> bool {
    let header =
        |name: &str| headers.get(name).and_then(|h| h.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    if header("x-forwarded-proto").contains("https") || header("forwarded").contains("proto=https") {
        return false;
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name == "localhost" || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A `Set-Cookie` value for the console's path.
fn set_cookie(headers: &HeaderMap, name: &str, value: &str, max_age: Option<u32>) -> HeaderValue {
    let secure = if on_loopback(headers) { "" } else { "; Secure" };
    let age = max_age.map(|s| format!("; Max-Age={s}")).unwrap_or_default();
    let text = format!("{name}={value}; Path=/console; HttpOnly; SameSite=Strict{secure}{age}");
    HeaderValue::from_str(&text).expect("cookie values are tokens")
}

impl FromRequestParts<ApiState> for Session {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, Self::Rejection> {
        let to_login = || Redirect::to("/console/login").into_response();
        let Some(token) = cookie(&parts.headers, SESSION).filter(|t| t.starts_with(API_TOKEN_PREFIX)) else {
            return Err(to_login());
        };
        let token = token.to_owned();
        let app = RawPathParams::from_request_parts(parts, state).await.ok().and_then(|params| {
            params.iter().find(|(name, _)| *name == "app").map(|(_, value)| value.to_owned())
        });
        match authenticate(state, &token, app.as_deref()).await {
            Ok(caller) => {
                let form_token = state.config.node.token_key.form_token(&token);
                Ok(Session { caller, form_token, token })
            }
            Err(e) if matches!(e.code(), "invalid_token" | "token_revoked" | "token_expired") => {
                Err(to_login())
            }
            Err(e) => Err(ErrorPage::of(&e)),
        }
    }
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    csrf: String,
    error: Option<String>,
}

/// The sign-in form, with a fresh double-submit value.
pub(crate) async fn login_page(headers: HeaderMap) -> Response {
    // Random, and without the prefix that would make it look like a token to secret scanners.
    let csrf = generate_api_token().split_off(API_TOKEN_PREFIX.len());
    let cookie = set_cookie(&headers, LOGIN, &csrf, Some(600));
    let page = render(&LoginPage { csrf, error: None }, StatusCode::OK);
    ([(header::SET_COOKIE, cookie)], page).into_response()
}

#[derive(Debug, Deserialize)]
pub(crate) struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    csrf: String,
}

/// Signs in with an API token: a session cookie and the apps page, or the form again with why.
pub(crate) async fn login(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Posted(form): Posted<LoginForm>,
) -> Response {
    if cookie(&headers, LOGIN).is_none_or(|expected| expected != form.csrf || form.csrf.is_empty()) {
        return ErrorPage::response(
            StatusCode::FORBIDDEN,
            "This sign-in form has expired: reload the page and try again.",
        );
    }
    let token = form.token.trim();
    let refused = |message: &str| {
        render(
            &LoginPage { csrf: form.csrf.clone(), error: Some(message.to_owned()) },
            StatusCode::UNAUTHORIZED,
        )
    };
    if !token.starts_with(API_TOKEN_PREFIX) {
        return refused("Sign in with an API token (pcr_…).");
    }
    match authenticate(&state, token, None).await {
        Ok(_) => {
            let session = set_cookie(&headers, SESSION, token, None);
            let spent = set_cookie(&headers, LOGIN, "", Some(0));
            let mut response = Redirect::to("/console").into_response();
            response.headers_mut().append(header::SET_COOKIE, session);
            response.headers_mut().append(header::SET_COOKIE, spent);
            response
        }
        Err(e) if e.code() == ErrorCode::Internal.as_str() => ErrorPage::of(&e),
        Err(e) => refused(e.message()),
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct LogoutForm {
    #[serde(default)]
    csrf: String,
}

/// Signs out: the session cookie is cleared.
pub(crate) async fn logout(
    State(state): State<ApiState>,
    session: Session,
    headers: HeaderMap,
    Posted(form): Posted<LogoutForm>,
) -> Response {
    if let Some(refused) = session.refuse_form(&state, &form.csrf) {
        return refused;
    }
    let cleared = set_cookie(&headers, SESSION, "", Some(0));
    ([(header::SET_COOKIE, cleared)], Redirect::to("/console/login")).into_response()
}

/// The headers every console answer carries: no framing, no sniffing, no caching of pages, and
/// only the console's own scripts and styles.
pub(crate) async fn secure_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn cookies_go_without_secure_only_on_a_loopback_host() {
        for loopback in ["localhost:8080", "127.0.0.1:8080", "127.1.2.3", "[::1]:8080", "localhost"] {
            let cookie = set_cookie(&host(loopback), SESSION, "pcr_x", None);
            assert_eq!(
                cookie, "picloud_session=pcr_x; Path=/console; HttpOnly; SameSite=Strict",
                "{loopback}"
            );
        }
        let mut proxied = host("127.0.0.1:8080");
        proxied.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        assert!(
            set_cookie(&proxied, SESSION, "pcr_x", None).to_str().unwrap().ends_with("; Secure"),
            "forwarded from https"
        );
        for remote in ["console.example.com", "10.0.0.5:8080", "[2001:db8::1]:443", "localhost.example.com"] {
            let cookie = set_cookie(&host(remote), SESSION, "pcr_x", Some(0));
            assert_eq!(
                cookie, "picloud_session=pcr_x; Path=/console; HttpOnly; SameSite=Strict; Secure; Max-Age=0",
                "{remote}"
            );
        }
        assert!(
            set_cookie(&HeaderMap::new(), SESSION, "pcr_x", None).to_str().unwrap().ends_with("; Secure")
        );
    }

    #[test]
    fn a_cookie_is_found_among_others_by_its_whole_name() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; picloud_session_old=x; picloud_session=pcr_y"),
        );
        assert_eq!(cookie(&headers, SESSION), Some("pcr_y"));
        assert_eq!(cookie(&headers, LOGIN), None);
    }
}
