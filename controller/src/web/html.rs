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
.sep{margin:1.5rem 0;border-top:1px solid #ddd}\
body.console header{display:flex;gap:1rem;align-items:center;flex-wrap:wrap;background:#1d2330;\
color:#fff;padding:.5rem 1.5rem}body.console header nav{display:flex;gap:.9rem;flex:1}\
body.console header a{color:#cfd8ff;text-decoration:none}body.console header a[aria-current]{color:#fff;\
font-weight:700;border-bottom:2px solid #fff}body.console header form button{margin:0}\
main.wide{max-width:78rem;margin:1.5rem auto}h2{font-size:1.1rem;margin-top:1.6rem}\
table{border-collapse:collapse;width:100%;font-size:.9rem}th,td{text-align:left;padding:.35rem .5rem;\
border-bottom:1px solid #e3e6ec;vertical-align:top}th{background:#f0f2f6}.scroll{overflow-x:auto}\
td.detail{word-break:break-all;max-width:30rem}tr.denied td{color:#b42318}\
.notice{background:#e8f3ec;border-left:4px solid #2f855a;padding:.5rem .8rem}\
.muted{color:#6b7280}button.danger{background:#b42318}button.small{padding:.25rem .6rem;margin:0;\
font-size:.85rem}form.inline{display:inline-block;margin-right:1rem}form.row{display:flex;gap:.8rem;\
flex-wrap:wrap;align-items:flex-end}form.row label{margin:0}.actions form{display:block;margin:.8rem 0}\
label.check{display:flex;gap:.4rem;align-items:center}textarea{width:100%;box-sizing:border-box;\
font-family:monospace;font-size:.85rem}ol#listing{font-size:.8rem}ol#listing code{white-space:pre}ol#listing li.bad{background:#fde8e8}\
ul#policy-errors{font-family:monospace}td.gain{color:#2f855a}td.loss{color:#b42318}\
#explain-result.allowed{border-left:4px solid #2f855a;padding-left:.6rem}\
#explain-result.denied{border-left:4px solid #b42318;padding-left:.6rem}li.fail{color:#b42318}";

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
