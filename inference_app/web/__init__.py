"""The browser-facing layer: credentials and the brake on guessing (auth), the UI's sign-in and sign-out (sign_in),
security headers, CORS and the body cap (security), and the Gradio chat (ui)."""
