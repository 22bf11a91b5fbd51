//! The console's pages as pure functions of the API's answers.

use super::*;

fn viewer(role: Role) -> Viewer {
    Viewer {
        login: "alice@example.com".into(),
        role,
        csrf: "tok".into(),
    }
}

fn node(name: &str) -> apb::Node {
    apb::Node {
        id: 7,
        name: name.into(),
        addresses: vec!["100.64.0.7".into()],
        user: "alice@example.com".into(),
        online: true,
        ..Default::default()
    }
}

#[test]
fn an_auditor_sees_every_page_without_a_single_form_that_changes_something() {
    let v = viewer(Role::Auditor);
    let n = node("laptop");
    let pages = [
        node_detail(&n, &v, 0),
        users_table(
            &[apb::User {
                login: "bob@example.com".into(),
                role: "member".into(),
                ..Default::default()
            }],
            &v,
        ),
        keys_page(
            &[apb::AuthKey {
                key_id: "k1".into(),
                ..Default::default()
            }],
            &v,
            None,
            0,
        ),
        PolicyEditor {
            file_name: "p.hujson",
            text: "{}",
            version: 3,
            outcome: Outcome::Plan(Vec::new()),
        }
        .render(&v),
    ];
    for p in &pages {
        assert!(!p.contains("method=\"post\""), "{p}");
    }
    // A network admin gets the node's actions and the policy's buttons,
    // not the role changes.
    let v = viewer(Role::NetworkAdmin);
    let detail = node_detail(&n, &v, 0);
    for op in ["rename", "quarantine", "expire", "delete"] {
        assert!(detail.contains(&format!("id=\"{op}\"")), "{op}");
    }
    assert!(detail.contains("name=\"csrf\" value=\"tok\""));
    assert!(!users_table(&[], &v).contains("/users/role"));
}

#[test]
fn what_nodes_and_users_say_about_themselves_is_escaped() {
    let v = viewer(Role::Admin);
    let mut n = node("<img src=x onerror=alert(1)>");
    n.hostname = "\"><script>alert(1)</script>".into();
    n.quarantined_since_ms = 1;
    n.quarantine_reason = "<b>".into();
    let html = nodes_table(std::slice::from_ref(&n), 0) + &node_detail(&n, &v, 0);
    assert!(!html.contains("<img") && !html.contains("<script") && !html.contains("<b>"));
    assert!(
        html.contains("id=\"release\""),
        "a quarantined node is released"
    );
}

#[test]
fn policy_errors_are_listed_and_marked_in_place() {
    let errors =
        "web policy.hujson:3:14: unknown tag \"tag:nope\"\nweb policy.hujson:7:2: expected ','";
    assert_eq!(error_lines(errors), vec![3, 7]);
    let html = PolicyEditor {
        file_name: "web policy.hujson",
        text: "{\n a\n b\n c\n d\n e\n f\n}",
        version: 2,
        outcome: Outcome::Errors(errors.into()),
    }
    .render(&viewer(Role::Admin));
    assert!(html.contains("<ul id=\"policy-errors\"><li>web policy.hujson:3:14: unknown tag &quot;tag:nope&quot;</li>"));
    assert!(html.contains("<li id=\"L3\" class=\"bad\">"));
    assert!(html.contains("<li id=\"L7\" class=\"bad\">"));
    assert!(html.contains("<li id=\"L2\"><code>"));
    assert!(!html.contains("id=\"apply\""), "nothing to apply");
}

#[test]
fn a_plan_carries_exactly_the_text_that_was_checked() {
    let text = "{\n\t\"acls\": [\"<&>\"],\r\n}\u{202e}";
    let shown = as_shown(text);
    assert_eq!(shown, "{\n\t\"acls\": [\"<&>\"],\n}");
    let html = PolicyEditor {
        file_name: "p",
        text: &shown,
        version: 4,
        outcome: Outcome::Plan(vec![apb::FlowChange {
            src: "laptop".into(),
            dst: "web".into(),
            gained: vec!["tcp:443".into()],
            lost: Vec::new(),
        }]),
    }
    .render(&viewer(Role::NetworkAdmin));
    assert!(html.contains(
        "name=\"text\" value=\"{&#10;&#9;&quot;acls&quot;: [&quot;&lt;&amp;&gt;&quot;],&#10;}\""
    ));
    assert!(html.contains("name=\"version\" value=\"4\""));
    assert!(html.contains("<td class=\"gain\">tcp:443</td>"));
}

#[test]
fn a_new_key_is_shown_once_and_notices_come_from_a_fixed_list() {
    let v = viewer(Role::NetworkAdmin);
    let html = keys_page(&[], &v, Some("ztmk1.abc.secret"), 0);
    assert!(html.contains("<code id=\"new-key\">ztmk1.abc.secret</code>"));
    assert!(!keys_page(&[], &v, None, 0).contains("new-key"));
    assert!(notice(Some("applied")).contains("Policy applied"));
    assert_eq!(notice(Some("<script>")), "");
    assert_eq!(notice(None), "");
}

#[test]
fn the_layout_names_the_person_and_marks_the_current_page() {
    let html = layout(&viewer(Role::Auditor), "Audit log", "/audit", "<p>x</p>");
    assert!(html.contains("<a href=\"/audit\" aria-current=\"page\">Audit log</a>"));
    assert!(html.contains("<span id=\"whoami\">alice@example.com (auditor)</span>"));
    assert!(html.contains("action=\"/logout\""));
    assert!(!html.contains("<script") && !html.contains("style=\""));
}
