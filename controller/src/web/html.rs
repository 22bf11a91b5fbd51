//! The pages' HTML: one layout, escaped text, no script, no inline style
//! (the CSP allows neither), no third-party resource.

/// Escapes text for HTML element content and double-quoted attributes;
/// control and deceptive formatting characters are dropped.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            c if crate::nodeinput::is_deceptive(c) => {}
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// A whole page: `body` is already HTML (built with [`esc`]).
pub fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · ztmesh</title><link rel=\"stylesheet\" href=\"/static/style.css\"></head>\
         <body><main><h1>{}</h1>\n{body}\n</main></body></html>\n",
        esc(title),
        esc(title)
    )
}

/// A hidden form field.
pub fn hidden(name: &str, value: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
        esc(name),
        esc(value)
    )
}

/// An error paragraph (`#error`), or nothing.
pub fn error(msg: Option<&str>) -> String {
    msg.map(|m| {
        format!(
            "<p id=\"error\" class=\"error\" role=\"alert\">{}</p>",
            esc(m)
        )
    })
    .unwrap_or_default()
}

/// The stylesheet (served from /static/style.css).
pub const STYLE: &str = "body{font-family:system-ui,sans-serif;background:#f6f7f9;color:#1d2330;margin:0}\
main{max-width:34rem;margin:3rem auto;background:#fff;padding:2rem;border-radius:8px;\
box-shadow:0 1px 4px rgba(0,0,0,.12)}h1{font-size:1.4rem;margin-top:0}\
label{display:block;margin:.8rem 0 .2rem}input[type=text],input[type=password]{width:100%;\
padding:.5rem;font-size:1rem;box-sizing:border-box}button,a.button{margin-top:1rem;padding:.55rem 1.1rem;\
font-size:1rem;border:0;border-radius:4px;background:#2553c7;color:#fff;cursor:pointer;\
text-decoration:none;display:inline-block}button.secondary{background:#6b7280}\
.error{color:#b42318;font-weight:600}dl{display:grid;grid-template-columns:auto 1fr;gap:.3rem 1rem}\
dt{font-weight:600}dd{margin:0;word-break:break-all}code{background:#eef0f4;padding:.1rem .3rem}\
.qr img{width:14rem;height:14rem}ul#recovery-codes{font-family:monospace;columns:2}\
.sep{margin:1.5rem 0;border-top:1px solid #ddd}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_leaves_no_markup_and_no_controls() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"q\"\u{7}"),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
        assert_eq!(esc("lap\u{202E}top\u{200B}-alice"), "laptop-alice");
        let p = page("<b>", &error(Some("<img src=x>")));
        assert!(!p.contains("<b>") && !p.contains("<img src=x>"));
        assert!(!p.contains("<script") && !p.contains("style=\""));
    }
}
