#!/usr/bin/env python3
"""Rebuild the golden PEC samples in this directory (not run by the tests).

The samples are written by hand in the layout real Italian providers use (see design.md §4 and
RFC 6109 §4.3): outer headers of a provider's system message, ``multipart/signed`` with
``application/x-pkcs7-signature`` (or ``pkcs7-signature``), a ``multipart/mixed`` whose first
part is ``multipart/alternative`` (plain text + HTML, ISO-8859-1 quoted-printable), then
``daticert.xml`` and ``postacert.eml`` in the real-world order (XML first). No third-party file
is copied: names, domains and ids are invented.

Only the S/MIME signature is made by a program: ``openssl smime/cms -sign`` with a throwaway key
(discarded) whose certificate is included in the signature; ``ca.pem`` is its issuer, so a test
can check that the signature verifies (at its signingTime) and breaks when a byte changes.

    python3 tests/golden/pec/regenerate.py
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAKETIME = ["faketime", "2012-09-21 13:16:40"] if shutil.which("faketime") else []


def crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode("latin-1")


def daticert(xml: str) -> str:
    """daticert.xml as real providers ship it: base64, 76-character lines."""
    return base64.encodebytes(xml.encode("utf-8")).decode("ascii")


ORIGINAL_PHOTOS = """\
Return-Path: <mario.rossi@pec.example.it>
Message-ID: <5058B2C2.4030607@pec.example.it>
Date: Fri, 21 Sep 2012 15:16:34 +0200
From: Mario Rossi <mario.rossi@pec.example.it>
MIME-Version: 1.0
To: anna.bianchi@mail.example.com
Subject: Photos
Content-Type: text/plain; charset=ISO-8859-1; format=flowed
Content-Transfer-Encoding: 7bit

Ciao Anna,
ecco le foto.

Mario
"""

SAMPLES: dict[str, dict[str, str]] = {
    # the published Postecert 2012 layout of design.md §4, filled in with invented values
    "posta-certificata": {
        "tool": "smime",
        "outer": """\
Received: from smtp.pec.example.it (smtp.pec.example.it [192.0.2.10])
\tby mx.pec.example.it (Postfix) with ESMTPS id 4XYZ123
\tfor <anna.bianchi@mail.example.com>; Fri, 21 Sep 2012 15:16:39 +0200 (CEST)
Date: Fri, 21 Sep 2012 15:16:38 +0200
Message-ID: <opec275.20120921151638.12345.06.1.48@pec.example.it>
From: "Per conto di: mario.rossi@pec.example.it" <posta-certificata@pec.example.it>
Reply-To: mario.rossi@pec.example.it
To: anna.bianchi@mail.example.com
Subject: POSTA CERTIFICATA: Photos
X-Riferimento-Message-ID: <5058B2C2.4030607@pec.example.it>
X-Trasporto: posta-certificata
""",
        "text": """\
--Questo =E8 un Messaggio di Posta Certificata--

Il giorno 21/09/2012 alle ore 15:16:38 (+0200) il messaggio
"Photos" =E8 stato inviato da "mario.rossi@pec.example.it"
indirizzato a:
anna.bianchi@mail.example.com
Il messaggio originale =E8 incluso in allegato.
Identificativo messaggio: opec275.20120921151638.12345.06.1.48@pec.example.it
""",
        "xml": """<?xml version="1.0" encoding="UTF-8"?>
<postacert tipo="posta-certificata" errore="nessuno"><intestazione><mittente>mario.rossi@pec.example.it</mittente><destinatari tipo="esterno">anna.bianchi@mail.example.com</destinatari><risposte>mario.rossi@pec.example.it</risposte><oggetto>Photos</oggetto></intestazione><dati><gestore-emittente>EXAMPLE PEC S.p.A.</gestore-emittente><data zona="+0200"><giorno>21/09/2012</giorno><ora>15:16:38</ora></data><identificativo>opec275.20120921151638.12345.06.1.48@pec.example.it</identificativo><ricevuta tipo="completa" /></dati></postacert>
""",  # noqa: E501 - one line, as providers write it
        "original": ORIGINAL_PHOTOS,
    },
    "accettazione": {
        "tool": "cms",
        "outer": """\
Date: Fri, 21 Sep 2012 15:16:38 +0200
Message-ID: <opec275.20120921151638.12345.06.1.47@pec.example.it>
From: "Posta Certificata" <posta-certificata@pec.example.it>
To: mario.rossi@pec.example.it
Subject: ACCETTAZIONE: Photos
X-Riferimento-Message-ID: <5058B2C2.4030607@pec.example.it>
X-Ricevuta: accettazione
""",
        "text": """\
Ricevuta di accettazione

Il giorno 21/09/2012 alle ore 15:16:38 (+0200) il messaggio
"Photos" proveniente da "mario.rossi@pec.example.it"
ed indirizzato a:
anna.bianchi@mail.example.com ("posta ordinaria")
luca.verdi@pec.other.example.it ("posta certificata")
=E8 stato accettato dal sistema ed inoltrato.
Identificativo messaggio: opec275.20120921151638.12345.06.1.48@pec.example.it
""",
        "xml": """<?xml version="1.0" encoding="UTF-8"?>
<postacert tipo="accettazione" errore="nessuno">
  <intestazione>
    <mittente>mario.rossi@pec.example.it</mittente>
    <destinatari tipo="esterno">anna.bianchi@mail.example.com</destinatari>
    <destinatari tipo="certificato">luca.verdi@pec.other.example.it</destinatari>
    <risposte>mario.rossi@pec.example.it</risposte>
    <oggetto>Photos</oggetto>
  </intestazione>
  <dati>
    <gestore-emittente>EXAMPLE PEC S.p.A.</gestore-emittente>
    <data zona="+0200">
      <giorno>21/09/2012</giorno>
      <ora>15:16:38</ora>
    </data>
    <identificativo>opec275.20120921151638.12345.06.1.48@pec.example.it</identificativo>
    <msgid>&lt;5058B2C2.4030607@pec.example.it&gt;</msgid>
  </dati>
</postacert>
""",
    },
    "avvenuta-consegna": {
        "tool": "smime",
        "outer": """\
Date: Fri, 21 Sep 2012 15:16:41 +0200
Message-ID: <opec299.20120921151641.5432.11.2.9@pec.other.example.it>
From: "Posta Certificata" <posta-certificata@pec.other.example.it>
To: mario.rossi@pec.example.it
Subject: CONSEGNA: Photos
X-Riferimento-Message-ID: <5058B2C2.4030607@pec.example.it>
X-Ricevuta: avvenuta-consegna
X-TipoRicevuta: completa
""",
        "text": """\
Ricevuta di avvenuta consegna

Il giorno 21/09/2012 alle ore 15:16:41 (+0200) il messaggio
"Photos" proveniente da "mario.rossi@pec.example.it"
ed indirizzato a "luca.verdi@pec.other.example.it"
=E8 stato consegnato nella casella di destinazione.
Identificativo messaggio: opec275.20120921151638.12345.06.1.48@pec.example.it
""",
        "xml": """<?xml version="1.0" encoding="UTF-8"?>
<postacert tipo="avvenuta-consegna" errore="nessuno"><intestazione><mittente>mario.rossi@pec.example.it</mittente><destinatari tipo="certificato">luca.verdi@pec.other.example.it</destinatari><risposte>mario.rossi@pec.example.it</risposte><oggetto>Photos</oggetto></intestazione><dati><gestore-emittente>OTHER PEC S.r.l.</gestore-emittente><data zona="+0200"><giorno>21/09/2012</giorno><ora>15:16:41</ora></data><identificativo>opec275.20120921151638.12345.06.1.48@pec.example.it</identificativo><msgid>&lt;5058B2C2.4030607@pec.example.it&gt;</msgid><ricevuta tipo="completa" /><consegna>luca.verdi@pec.other.example.it</consegna></dati></postacert>
""",  # noqa: E501
        "original": ORIGINAL_PHOTOS.replace("anna.bianchi@mail.example.com",
                                            "luca.verdi@pec.other.example.it"),
    },
    "errore-consegna": {
        "tool": "cms",
        "outer": """\
Date: Fri, 21 Sep 2012 15:16:42 +0200
Message-ID: <opec299.20120921151642.5433.11.2.9@pec.other.example.it>
From: "Posta Certificata" <posta-certificata@pec.other.example.it>
To: mario.rossi@pec.example.it
Subject: AVVISO DI MANCATA CONSEGNA: Photos
X-Riferimento-Message-ID: <5058B2C2.4030607@pec.example.it>
X-Ricevuta: errore-consegna
""",
        "text": """\
Avviso di mancata consegna

Il giorno 21/09/2012 alle ore 15:16:42 (+0200) nel messaggio
"Photos" proveniente da "mario.rossi@pec.example.it"
ed indirizzato a "nessuno@pec.other.example.it"
=E8 stato rilevato un problema che ne impedisce la consegna.
Errore: 5.1.1 - Utente non esistente
Identificativo messaggio: opec275.20120921151638.12345.06.1.48@pec.example.it
""",
        "xml": """<?xml version="1.0" encoding="UTF-8"?>
<postacert tipo="errore-consegna" errore="no-dest"><intestazione><mittente>mario.rossi@pec.example.it</mittente><destinatari tipo="certificato">nessuno@pec.other.example.it</destinatari><risposte>mario.rossi@pec.example.it</risposte><oggetto>Photos</oggetto></intestazione><dati><gestore-emittente>OTHER PEC S.r.l.</gestore-emittente><data zona="+0200"><giorno>21/09/2012</giorno><ora>15:16:42</ora></data><identificativo>opec275.20120921151638.12345.06.1.48@pec.example.it</identificativo><msgid>&lt;5058B2C2.4030607@pec.example.it&gt;</msgid><consegna>nessuno@pec.other.example.it</consegna><errore-esteso>5.1.1 - Utente non esistente</errore-esteso></dati></postacert>
""",  # noqa: E501
    },
}


def inner_entity(sample: dict[str, str], n: int) -> bytes:
    html = ("<html><body>\n<p>" + sample["text"].replace("\n\n", "</p>\n<p>")
            .replace("\n", "<br>\n").replace("<br>\n<p>", "\n<p>") + "</p>\n</body></html>\n")
    parts = [f"""\
Content-Type: multipart/alternative; boundary="----=_Part_{n}_2"

------=_Part_{n}_2
Content-Type: text/plain; charset=iso-8859-1
Content-Transfer-Encoding: quoted-printable

{sample["text"]}
------=_Part_{n}_2
Content-Type: text/html; charset=iso-8859-1
Content-Transfer-Encoding: quoted-printable

{html}
------=_Part_{n}_2--
""", f"""\
Content-Type: application/xml; name="daticert.xml"
Content-Transfer-Encoding: base64
Content-Disposition: inline; filename="daticert.xml"

{daticert(sample["xml"])}"""]
    if "original" in sample:
        parts.append(f"""\
Content-Type: message/rfc822; name="postacert.eml"
Content-Disposition: inline; filename="postacert.eml"

{sample["original"]}""")
    body = f'Content-Type: multipart/mixed; boundary="----=_Part_{n}_1"\n\n'
    for part in parts:
        body += f"------=_Part_{n}_1\n{part}\n"
    body += f"------=_Part_{n}_1--\n"
    return crlf(body)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)

        def run(*args: str) -> None:
            # under faketime (when installed) the signingTime is the samples' own date
            subprocess.run([*FAKETIME, "openssl", *args], check=True, capture_output=True)

        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{d}/ca.key", "-out",
            str(HERE / "ca.pem"), "-days", "36500", "-subj", "/O=Example/CN=Example PEC Test Root",
            "-addext", "basicConstraints=critical,CA:true",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        for name, domain in (("example", "pec.example.it"), ("other", "pec.other.example.it")):
            (d / "ext").write_text("keyUsage=critical,digitalSignature\n"
                                   f"subjectAltName=email:posta-certificata@{domain}\n")
            run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{d}/{name}.key", "-out",
                f"{d}/{name}.csr", "-subj", f"/O={name.upper()} PEC/CN=Posta Certificata {domain}")
            run("x509", "-req", "-in", f"{d}/{name}.csr", "-CA", str(HERE / "ca.pem"), "-CAkey",
                f"{d}/ca.key", "-CAcreateserial", "-CAserial", f"{d}/ca.srl",
                "-out", f"{d}/{name}.pem", "-days", "36500", "-extfile", f"{d}/ext")
        for n, (sample_name, sample) in enumerate(SAMPLES.items(), start=1):
            signer = "other" if "other.example.it>" in sample["outer"].split("From:")[1] \
                .splitlines()[0] else "example"
            (d / "inner").write_bytes(inner_entity(sample, n))
            run(sample["tool"], "-sign", "-md", "sha256", "-in", f"{d}/inner", "-signer",
                f"{d}/{signer}.pem", "-inkey", f"{d}/{signer}.key", "-out", f"{d}/signed")
            signed = (d / "signed").read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            (HERE / f"{sample_name}.eml").write_bytes(crlf(sample["outer"]) + signed)


if __name__ == "__main__":
    main()
