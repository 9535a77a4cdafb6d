//! What an accepted message holds, for operators: its decoded Subject and
//! the content type and decoded size of each MIME leaf part. mail-parser
//! reads it, after the strict scan of `mm4` (our own) has accepted the
//! message: a general parser's forgiveness is harmless here, where
//! nothing is decided, only shown. Never on a session's path: `queue
//! show` asks for it.

use mail_parser::{HeaderName, MessageParser, MimeHeaders, PartType};

/// Most octets read: anything longer is summarised from its start.
pub const MAX_SUMMARY: usize = 32 * 1024 * 1024;

/// Most parts listed; the rest are counted.
pub const MAX_PARTS: usize = 50;

/// One MIME leaf part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    /// `type/subtype`, lower case (`text/plain` when the part says none).
    pub content_type: String,
    /// Its size once its transfer encoding is undone.
    pub size: usize,
}

/// A message's content, as operators see it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// The Subject, RFC 2047 words decoded.
    pub subject: Option<String>,
    /// The leaf parts, in order, at most [`MAX_PARTS`].
    pub parts: Vec<Part>,
    /// Leaf parts past [`MAX_PARTS`].
    pub more: usize,
}

/// The summary of `data` (a whole message, header and body), or `None` if
/// mail-parser cannot read it at all.
pub fn summarize(data: &[u8]) -> Option<Summary> {
    let data = &data[..data.len().min(MAX_SUMMARY)];
    // Only what the summary reads: the MIME headers and the Subject.
    let m = MessageParser::new()
        .with_mime_headers()
        .header_text(HeaderName::Subject)
        .parse(data)?;
    let mut summary = Summary {
        subject: m.subject().map(str::to_string),
        ..Summary::default()
    };
    // Parts of a message/rfc822 part count as that part, not as leaves.
    for part in m
        .parts
        .iter()
        .filter(|p| !matches!(p.body, PartType::Multipart(_)))
    {
        if summary.parts.len() == MAX_PARTS {
            summary.more += 1;
            continue;
        }
        let content_type = part.content_type().map_or("text/plain".into(), |c| {
            let sub = c.subtype().unwrap_or("");
            format!("{}/{sub}", c.ctype()).to_ascii_lowercase()
        });
        summary.parts.push(Part {
            content_type,
            size: part.len(),
        });
    }
    Some(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_decoded_and_leaf_parts_with_their_decoded_sizes() {
        let m = b"X-Mms-Message-Type: MM4_forward.REQ\r\n\
            Subject: =?UTF-8?B?SG9sYSBtdW5kbw==?=\r\n\
            MIME-Version: 1.0\r\n\
            Content-Type: multipart/related; boundary=\"b1\"\r\n\
            \r\n\
            --b1\r\n\
            Content-Type: text/plain; charset=utf-8\r\n\
            \r\n\
            hello\r\n\
            --b1\r\n\
            Content-Type: image/JPEG\r\n\
            Content-Transfer-Encoding: base64\r\n\
            \r\n\
            AAECAwQFBgcICQ==\r\n\
            --b1--\r\n";
        let s = summarize(m).unwrap();
        assert_eq!(s.subject.as_deref(), Some("Hola mundo"));
        assert_eq!(
            s.parts,
            [
                Part {
                    content_type: "text/plain".into(),
                    size: 5
                },
                Part {
                    content_type: "image/jpeg".into(),
                    size: 10
                },
            ]
        );
        assert_eq!(s.more, 0);
    }

    #[test]
    fn many_parts_are_counted_past_the_cap() {
        let mut m = String::from("Content-Type: multipart/mixed; boundary=x\r\n\r\n");
        for _ in 0..MAX_PARTS + 7 {
            m.push_str("--x\r\nContent-Type: text/plain\r\n\r\nx\r\n");
        }
        m.push_str("--x--\r\n");
        let s = summarize(m.as_bytes()).unwrap();
        assert_eq!((s.parts.len(), s.more), (MAX_PARTS, 7));
        assert_eq!(s.subject, None);
    }
}
